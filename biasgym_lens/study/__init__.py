"""The whole study: the staged pipeline with its artifact folder, the report, the plots and the command line."""
