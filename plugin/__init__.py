"""sd-vram's pytest plugin: `pytest --gpu` measures the catalogue on a real GPU and archives it;
plain `pytest` re-checks the equation against the archives (docs/gpu-suite.md).

Owns everything that touches a real GPU or its archived results:
- the suite: pytest_plugin.py (options and hooks), session.py (the run's state, SuiteState),
  suite.py (the tests), checks.py (the verdict on a case), table.py (the terminal summary);
- the catalogue of cases (cases.py) and the archives (archive.py, results/README.md);
- the measurement backends: backends.py (the Backend protocol, the Measurement, the fake
  backend), gpu.py (CUDA and NVML), environment.py (versions, env vars, GPU pinning);
- the device tasks and what reads their files: probe.py (`sd-vram probe`), conv_probe.py,
  memhistory.py, device_tasks.py, budgets.py, compare.py (`sd-vram compare`).

May import: formula/ (sd_vram.formula: the equation, its options and GPU profiles), and from
sd_vram/ the pipeline builder and stage hooks shared with the simulation (sd_vram.models,
sd_vram.stages) and the version. Never simulation/ (sd_vram.simulation) nor the CLI; torch,
diffusers and pynvml only inside the functions that measure.
"""
