"""Benchmarks and profiling: end-to-end throughput, steps-vs-quality sweeps, roofline numbers, the GPU check.

Every benchmark here reports a ratio against a baseline measured in the same run on the same inputs and
the achieved FLOP/s or bytes/s against the device's peak, and appends one self-describing JSON line per
configuration to the results file (:mod:`dinfill.bench.report`). Entry points: ``dinfill bench`` and
``dinfill sweep`` (:mod:`dinfill.bench.cli`), ``python -m dinfill.bench.gpu_check``,
``python -m dinfill.bench.forward``. Submodules are imported on use, so ``import dinfill.bench`` is cheap.
"""
