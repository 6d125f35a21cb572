"""HTML reports people read instead of JSON: drift, cycle and shadow comparisons."""
