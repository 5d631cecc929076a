"""Small shared helpers: errors and CLI exit codes, atomic files, nnU-Net paths, seeding."""
