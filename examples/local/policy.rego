# The policy of the README's "Behind your own Envoy": one Envoy on this machine
# (envoy/local-grpc.yaml) asks authz-server about every request.
#
#   GET /public/...                       allowed, for anyone
#   /admin/... with the header x-role: admin   allowed (a stand-in for a real identity: see
#                                         "Identity and sessions" in the README)
#   anything else                         403, with a body that says what would pass
#
# Written for the OPA-Envoy plugin: it runs unchanged there too.
package envoy.authz

import rego.v1

default allow := {
	"allowed": false,
	"http_status": 403,
	"body": "denied by authz-server: only GET /public/... and, with x-role: admin, /admin/... pass\n",
}

http := input.attributes.request.http

allow := {"allowed": true, "headers": {"x-checked-by": "authz-server"}} if {
	http.method == "GET"
	startswith(http.path, "/public/")
}

allow := {"allowed": true, "headers": {"x-checked-by": "authz-server"}} if {
	startswith(http.path, "/admin/")
	http.headers["x-role"] == "admin"
}
