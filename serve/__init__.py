"""The Ray Serve application: HTTP ingress and the adapter-swapping generator."""
