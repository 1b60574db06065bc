"""BiasScope: score every attention head, choose the responsible ones, intervene on them with hooks, and measure what that removes."""
