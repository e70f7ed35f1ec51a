"""Measuring the harness itself: the false-alarm audit, calibration of the factors, the benchmark."""
