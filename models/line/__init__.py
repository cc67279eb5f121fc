"""The synthetic line, module by module; import its public names from ``kensa.models.line.synthetic``."""
