import torch, triton, torch.nn.functional as F
from fla_cuda.ops.recurrent_cuda import fused_recurrent_cuda
B,H,K,V=64,16,128,128
dev="cuda"
def mk(n):
    return [dict(q=torch.randn(B,1,H,K,device=dev,dtype=torch.bfloat16),k=F.normalize(torch.randn(B,1,H,K,device=dev),dim=-1).bfloat16(),
      v=torch.randn(B,1,H,V,device=dev,dtype=torch.bfloat16),g=F.logsigmoid(torch.randn(B,1,H,device=dev)),
      gk=F.logsigmoid(torch.randn(B,1,H,K,device=dev)),beta=torch.rand(B,1,H,device=dev).sigmoid(),
      a=torch.randn(B,1,H,K,device=dev,dtype=torch.bfloat16)*0.1,b=torch.randn(B,1,H,K,device=dev,dtype=torch.bfloat16)*0.1,
      h0=torch.randn(B,H,K,V,device=dev)) for _ in range(n)]
sets=mk(3)
cfgs={"simple_gla":dict(g=1),"gla":dict(gk=1),"delta":dict(beta=1,delta=True),"gated_delta":dict(g=1,beta=1,delta=True),"dplr":dict(a=1,b=1,gk=1)}
floor=2*B*H*K*V*4/3.02e12*1e3
for name,c in cfgs.items():
    i=[0]
    def f():
        s=sets[i[0]%3]; i[0]+=1
        kw={n:s[n] for n in c if n!="delta"}
        return fused_recurrent_cuda(s["q"],s["k"],s["v"],delta=c.get("delta",False),scale=K**-0.5,initial_state=s["h0"],output_final_state=True,**kw)
    ms=triton.testing.do_bench(f,warmup=25,rep=200,return_mode="median")
    print(f"decode {name:12s} {ms:.4f} ms  floor {floor:.4f} ms  x{ms/floor:.2f}")
