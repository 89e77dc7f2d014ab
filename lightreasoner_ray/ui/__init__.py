"""What a person sees: the console, experiment tracking, reports and Ray's metrics."""
