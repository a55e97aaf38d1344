"""`mtlm report RUN [--output DIR]`: one self-contained HTML page plus the PNG figures it shows, made with
matplotlib from what the run folder holds (`collect`), dev predictions from the run's stored rows
(`dev_outputs`), figures (`figures`), the page (`page.write_report`). matplotlib is imported by `figures`
only (the `report` extra)."""
