"""cxrtune's benchmark suite: ``python -m benchmarks.run [--quick] [--only NAME ...]``.

Every figure is measured against a baseline taken in the same run, each side
repeated and interleaved; ``benchmarks/README.md`` says what each one measures.
"""
