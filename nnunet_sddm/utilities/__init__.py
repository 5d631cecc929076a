"""Small shared helpers: errors and CLI exit codes, atomic files, nnU-Net paths and the trainer folder,
devices, torchrun set-up, progress bars, the start-up environment check."""
