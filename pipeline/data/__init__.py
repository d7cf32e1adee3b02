"""Training data on disk: LLaVA records in (`llava`), WebDataset shards out (`shards`), batches (`loader`)."""
