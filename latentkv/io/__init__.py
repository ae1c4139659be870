"""Files and the machine: atomic writes, safetensors shards, native checkpoint files, text, memory."""
