"""The capture-and-score harness: one full prefill captured, then any compressed cache scored against it."""
