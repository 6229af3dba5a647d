"""Memory planning without weights: what a spec needs per rank (`ncft plan`).

`model` describes a model from its config (meta device), `stage` marks what a
method trains, `shards` what each engine keeps of a parameter on a rank, `memory`
holds the per-rank arithmetic and its documentation, and
`report` turns a spec into the text or JSON plan.
"""
