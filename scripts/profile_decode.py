"""Profile the decode step of each family: every kernel launched and its device time."""
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fla_cuda

B, H, K, V = 64, 16, 128, 128
d = "cuda"
torch.manual_seed(0)
q = torch.randn(B, 1, H, K, device=d, dtype=torch.bfloat16)
k = F.normalize(torch.randn(B, 1, H, K, device=d), dim=-1).bfloat16()
v = torch.randn(B, 1, H, V, device=d, dtype=torch.bfloat16)
g = F.logsigmoid(torch.randn(B, 1, H, device=d))
gk = F.logsigmoid(torch.randn(B, 1, H, K, device=d)) / 16
beta = torch.rand(B, 1, H, device=d).sigmoid().bfloat16()
a = -k
b = (k * torch.rand(B, 1, H, 1, device=d)).bfloat16()
h0 = torch.randn(B, H, K, V, device=d)
st = dict(initial_state=h0, output_final_state=True)
out = torch.empty_like(h0)
calls = {
    # the bound a decode step can reach in practice: a device copy of the same bytes (state in, out)
    "copy of the state": lambda: out.copy_(h0),
    "simple_gla": lambda: fla_cuda.fused_recurrent_simple_gla(q, k, v, g=g, **st),
    "gla": lambda: fla_cuda.fused_recurrent_gla(q, k, v, gk=gk, **st),
    "delta": lambda: fla_cuda.fused_recurrent_delta_rule(q, k, v, beta=beta, **st),
    "gated_delta": lambda: fla_cuda.fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, **st),
    "dplr": lambda: fla_cuda.fused_recurrent_dplr_delta_rule(q, k, v, a, b, gk, **st),
}
for name, fn in calls.items():
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    print(f"== {name}")
    for e in prof.key_averages():
        if e.device_time_total > 0:
            print(f"   {e.count:4d} x {e.device_time_total / e.count:8.2f} us  {e.key[:90]}")
