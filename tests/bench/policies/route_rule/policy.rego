# The rule the native RBAC set-up enforces too, so the two differ only in who decides.
package envoy.authz

import rego.v1

default allow := false

allow if {
	input.attributes.request.http.method == "GET"
	startswith(input.attributes.request.http.path, "/people")
	input.attributes.request.http.headers["x-role"] == "guest"
}
