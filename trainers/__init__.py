"""Sparse-autoencoder training on saev-store activation stores: several SAEs per pass over the data.

`trainers.run.run_training` (the `saev-train` command) trains, evaluates and exports; `trainers.sae_io`
loads an exported SAE (`load_sae`, `load_run`) and applies it to raw activations.
"""
