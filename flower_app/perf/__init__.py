"""Process settings for speed: the allocator's thresholds, imports without the cyclic GC."""
