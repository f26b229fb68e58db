"""What the online kNN monitor costs at its defaults (1000 + 500 images, every 500 steps) against a demo training step
(batch 64): `python benchmarks/monitor_cost.py` (CPU). See RESULTS.md section 8."""

import time, torch
from types import SimpleNamespace
from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from simmim_hf.pretrain.monitor import KNNMonitor, prepare_monitor_set

torch.manual_seed(0)
config = SimMIMConfig.for_pretraining("demo", None, None)
model = SimMIMForMaskedImageModeling(config)
spec = SimpleNamespace(
    monitor_dataset="fashion-mnist",
    monitor_data_files=None,
    monitor_train_samples=1000,
    monitor_eval_samples=500,
    seed=0,
)
t = time.perf_counter()
ms = prepare_monitor_set(spec, config)
prep = time.perf_counter() - t
mon = KNNMonitor(ms, 500, 64)
t = time.perf_counter()
v = mon.measure(model)
meas = time.perf_counter() - t
opt = torch.optim.AdamW(model.parameters(), 1e-3)
x = torch.randn(64, config.num_channels, config.image_size, config.image_size)
mask = SimMIMMaskGenerator.from_config(config)(64)
model.train()
times = []
for i in range(6):
    t = time.perf_counter()
    loss = model(x, bool_masked_pos=mask).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t)
step = sorted(times[1:])[len(times[1:]) // 2]
print(
    f"prepare {prep:.2f}s measure {meas:.2f}s (top1 {v:.3f}) step {step:.3f}s -> per 500 steps {meas / (500 * step) * 100:.2f}%"
)
