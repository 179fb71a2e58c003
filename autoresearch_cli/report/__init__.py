"""What users see of the ledger, beside the CLI: readers only, nothing here writes.

    log.py       `ar log`: the table, --best, --json, the summary line
    plot.py      `ar log --plot`: the progress chart (matplotlib), and its numbers
    tree.py      `ar log --tree`: every experiment under the commit it built on
    walltime.py  `ar log --timing`: where each run's wall time went
    facts.py     `ar report`: everything the report says, as data, from the evidence
    svg.py       the progress chart as inline SVG, for the page
    page.py      the report as one self-contained HTML page
    markdown.py  the report as Markdown, for a pull request
    serve.py     `ar report --serve`: the live page (stdlib HTTP, the ledger read-only)
    write.py     `ar report`'s core: open the ledger read-only, build, write both files

A dashboard of another kind is one more module here, reading facts.py.
"""
