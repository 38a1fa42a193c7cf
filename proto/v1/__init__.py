"""Generated code for the optserve.v1 API. Do not edit: run proto/generate.py."""
