"""Serving beyond one engine: engine replicas behind one OpenAI-compatible endpoint.

`proxy.py` carries an HTTP request to a replica's own ember app and its response back (no
Ray in it); `ray.py` runs the replicas as Ray Serve deployments with prefix-aware routing.
"""
