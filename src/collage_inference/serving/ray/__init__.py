"""The Ray Serve backend: the same front end and models, scaled out over a Ray cluster.

    collage serve --backend ray                       # a private Ray instance on this machine
    collage serve --config examples/ray.toml --address auto    # join a running cluster

Layout (one code path, two transports):

    deployments.py  ModelDeployment: the model server core as one replica (straggling by rank)
    ingress.py      Ingress: the FrontEnd (grouper, encoder, decoder: the very same code) behind
                    Ray Serve's HTTP proxy, serving the front end's one route table

The transport is :mod:`collage_inference.serving.transports.ray`; the launcher that builds the
application from a ServeConfig is :mod:`collage_inference.deploy.ray`.

Ray is an optional extra; the launcher (:mod:`collage_inference.deploy.ray`) says how to
install it when it is missing.
"""
