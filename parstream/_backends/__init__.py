"""The engines behind ``parstream._backend``: ``local`` (worker processes),
``inline`` (the calling process, for debugging) and ``ray`` (a cluster).

Kept empty: worker processes import this package on their way to
``local._worker``, and must not pay for anything else.
"""
