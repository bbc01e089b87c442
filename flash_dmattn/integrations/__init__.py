"""Integrations of flash_dmattn with other libraries.

Each integration is its own submodule and imports its library only when it is imported itself, so
`import flash_dmattn` never imports them:

- `flash_dmattn.integrations.transformers`: attn_implementation="flash_dmattn" for Hugging Face
  transformers models (see docs/transformers.md).
"""
