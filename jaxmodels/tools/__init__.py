"""What you do with a trained run: evaluate it (`evaluate`), compress it (`compress`), sample from it
(`sample`), plot its curves (`plot`)."""
