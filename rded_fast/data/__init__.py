"""Built-in real datasets (Fashion-MNIST) materialised as ImageFolder trees."""
