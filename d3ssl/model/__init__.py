"""ResNet-C4 backbone, heads, the D3SSL and SoCo modules, and their losses."""
