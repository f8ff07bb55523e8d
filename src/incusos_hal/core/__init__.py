"""Small pieces every layer may use: atomic files and trees, kmsg, YAML output."""
