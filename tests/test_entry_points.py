"""`python -m fla_cuda info` and the demo (what `make demo` runs), on a small shape."""
import subprocess
import sys

from fla_cuda import backend, demo


def test_info_lists_every_op():
    out = subprocess.run([sys.executable, "-m", "fla_cuda", "info"], capture_output=True, text=True, check=True)
    assert "fla_cuda" in out.stdout and "torch" in out.stdout
    for op in backend.OPS:
        assert op in out.stdout


def test_demo_decode_matches_one_shot():
    """Prefill + token-by-token decode carrying the state reproduces the one-shot output."""
    errors = demo.main(shape=(1, 96, 2, 32, 32), decode_steps=8)
    assert set(errors) == set(demo.FAMILIES)
    for fam, err in errors.items():
        assert err < 1e-5, (fam, err)


def test_junit_summary(tmp_path):
    """The GPU runner's test summary JSON counts outcomes and keeps failure messages."""
    sys.path.insert(0, "scripts")
    from junit_summary import summarize
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite>'
                   '<testcase classname="t" name="a"/>'
                   '<testcase classname="t" name="b"><failure message="boom"/></testcase>'
                   '<testcase classname="t" name="c"><skipped message="no gpu"/></testcase>'
                   '</testsuite></testsuites>')
    s = summarize(str(xml))
    assert (s["passed"], s["failed"], s["skipped"]) == (1, 1, 1)
    assert s["failures"] == [{"test": "t::b", "message": "boom"}]
