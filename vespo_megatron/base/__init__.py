"""The ground floor: what every layer shares and nothing here imports from the rest of the package.

`metric`: metrics that carry their reduction (needs torch); `validation`: the one way a config reports a bad
field; `imports`: plug-ins by import path; `known_warnings`: third-party warnings filtered at start. Import
the submodules directly: this package imports nothing, so that light users (the math checker's worker
processes, the command line before validation) do not pay for torch.
"""
