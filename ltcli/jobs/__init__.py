"""The jobs behind the commands, one module per command.

Each has a keyword-only options dataclass that validates itself (`ltcli.options`) and a
`run(options, run_dir)` that does the work and returns what it wrote. The CLI only turns
flags (and a config file) into options, calls `run`, and prints; a notebook can do the same:

    from ltcli.jobs import fit
    from ltcli.rundir import RunDir
    fit.run(fit.FitOptions(method="crt", head={"epochs": 20}), RunDir("ltcli-run"))
"""
