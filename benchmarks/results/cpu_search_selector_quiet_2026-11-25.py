import time, torch, numpy as np, faiss
from bct_fast.ops import cosine_topk
torch.manual_seed(0)
rows=[(10000,10000,64,100),(2000,200000,64,10),(2000,200000,128,10),(256,200000,256,1000),(16,1000000,128,100),(2000,1000000,64,1000)]
print("| Q | N | d | k | bct_fast (default) | faiss | ratio |"); print("|---|---|---|---|---|---|---|")
for Q,N,d,k in rows:
    g=torch.nn.functional.normalize(torch.randn(N,d),dim=1); q=torch.nn.functional.normalize(torch.randn(Q,d),dim=1)
    idx=faiss.IndexFlatIP(d); idx.add(g.numpy()); qn=q.numpy()
    tb=[];tf=[]
    for r in range(3):
        t=time.perf_counter(); cosine_topk(q,g,k,normalize=False); tb.append(time.perf_counter()-t)
        t=time.perf_counter(); idx.search(qn,k); tf.append(time.perf_counter()-t)
    b,f=np.median(tb),np.median(tf)
    print(f"| {Q} | {N:,} | {d} | {k} | {b*1000:.0f} ms | {f*1000:.0f} ms | {b/f:.2f}x |", flush=True)
