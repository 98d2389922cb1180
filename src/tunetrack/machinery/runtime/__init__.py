"""The process a command runs in and its machine: the garbage collector while it imports,
stop signals, where its lines go, how much memory and which GPUs it has, the files of --import."""
