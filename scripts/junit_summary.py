"""junit XML (pytest --junitxml) -> a JSON summary: counts and the failing tests with their messages.

    python scripts/junit_summary.py pytest.xml tests.json
"""
import json
import sys
import xml.etree.ElementTree as ET


def summarize(xml_path: str) -> dict:
    root = ET.parse(xml_path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                failures.append({"test": f"{case.get('classname')}::{case.get('name')}",
                                 "message": (child.get("message") or "")[:500]})
            elif child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
    return {**counts, "failures": failures}


if __name__ == "__main__":
    summary = summarize(sys.argv[1])
    with open(sys.argv[2], "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{summary['passed']} passed, {summary['failed'] + summary['errors']} failed, "
          f"{summary['skipped']} skipped")
