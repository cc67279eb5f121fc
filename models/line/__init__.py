"""The synthetic line, module by module; import its public names from ``models.synthetic``."""
