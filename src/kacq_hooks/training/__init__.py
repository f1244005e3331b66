"""Training-time parts: Trainer callbacks, sharpness-aware minimization, formatting augmentation."""
