"""What a run costs: the benchmark (driver, shared measures, model runs) and the GPU probe."""
