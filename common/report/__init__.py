"""Reports of benchmark/demo results (PNG plots, one self-contained HTML page) and small SVG charts."""
