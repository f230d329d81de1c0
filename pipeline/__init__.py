"""The Ray side of rg-batch: job config, readers, stages, writer, CLI."""
