"""The project's one HTTP layer: the route table (:mod:`.routes`), the server every service
listens with (:mod:`.server`) and the client every service calls others with (:mod:`.client`).
"""
