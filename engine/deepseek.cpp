// placeholder: the DeepSeek forward pass is being written
