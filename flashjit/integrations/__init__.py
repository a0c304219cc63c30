"""Integrations of flashjit with other libraries, one module each (imported on demand, never from here,
so that `import flashjit` needs none of those libraries).

- `flashjit.integrations.transformers`: `register()` makes `attn_implementation="fjit"` work in Hugging
  Face transformers 5.x.
"""
