"""Does idle time between engine steps slow the next step? (H100, Llama-68M / Llama-2-7B, eager HF)."""
import json, os, sys, time
import numpy as np
import torch
from profiler import engine as E

out = os.environ["OUT"]
DEV = os.environ.get("DEV", "cuda")
eng = E.Engine(os.environ.get("TGT", "llama-2-7b"), os.environ.get("DRF", "llama-68m"), E.EngineConfig(device=DEV, dtype=os.environ.get("DT", "bfloat16"), max_batch=8, clock="wall"),
               max_len=512)
clock = E.make_clock("wall", DEV)
try:
    import pynvml
    pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0)
    sm = lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
except Exception as e:  # noqa: BLE001
    print("no nvml:", e); sm = lambda: -1
ids = list(range(5, 105))
for s in range(4):
    E.prefill_into_slot(eng.target, eng.tcache, s, ids, 1.0, eng.gen, DEV)
    E.prefill_into_slot(eng.draft, eng.dcache, s, ids, 1.0, eng.gen, DEV)
last = torch.zeros(4, dtype=torch.long, device=DEV)
lengths = torch.full((4,), 100, dtype=torch.long, device=DEV)
for _ in range(10):
    eng.spec_step(last, lengths, 4, None)
res = []
GAPS = [float(x) for x in os.environ.get("GAPS", "0,0.005,0.02,0.1,0.3").split(",")]
MODES = os.environ.get("MODES", "sleep,spin").split(",")
for rnd in range(int(os.environ.get("ROUNDS", "2"))):
    for mode in MODES:
        for gap in GAPS:
            if mode == "spin" and gap == 0.0:
                continue
            ts, clk, after = [], [], []
            for _ in range(int(os.environ.get("REPS", "0")) or (20 if gap < 0.3 else 10)):
                if mode == "sleep":
                    time.sleep(gap)
                else:
                    t_end = time.perf_counter() + gap
                    while time.perf_counter() < t_end:
                        pass
                clk.append(sm())
                t0 = clock(); eng.spec_step(last, lengths, 4, None); ts.append(clock() - t0); after.append(sm())
            r = dict(round=rnd, mode=mode, gap_s=gap, median_ms=1e3 * float(np.median(ts)), p10_ms=1e3 * float(np.percentile(ts, 10)),
                     p90_ms=1e3 * float(np.percentile(ts, 90)), first_ms=1e3 * ts[0], sm_mhz_before=clk, sm_mhz_after=after, all_ms=[round(1e3 * t, 1) for t in ts])
            print(json.dumps(r)); res.append(r)
# gamma 0 and batch 1 back to back, for scale
for g in (0, 4):
    ts = []
    for _ in range(20):
        t0 = clock(); eng.spec_step(last[:1], lengths[:1], g, None); ts.append(clock() - t0)
    print(json.dumps(dict(batch=1, gamma=g, median_ms=1e3 * float(np.median(ts)))))
json.dump(res, open(f"{out}/idle.json", "w"), indent=1)
