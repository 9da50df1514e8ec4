"""sd-vram's pytest plugin: `pytest --gpu` measures the catalogue on a real GPU and archives it;
plain `pytest` re-checks the equation against the archives (docs/gpu-suite.md)."""
