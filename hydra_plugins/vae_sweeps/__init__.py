"""Hydra plugins of vae-sweeps: the submitit launchers that keep a sweep going when a member is killed."""
