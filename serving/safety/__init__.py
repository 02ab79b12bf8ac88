"""The output-image safety stage: letterboxing, the detector's decoding, and the operator's thresholds."""
