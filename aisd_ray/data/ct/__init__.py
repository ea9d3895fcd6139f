"""CT in Hounsfield units made model input: HU windows, the input channel modes, the head model,
and the QA gate that records each case's domain values and findings."""
