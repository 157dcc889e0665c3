package envoy.authz_test

import rego.v1

import data.envoy.authz

request(method, path, headers) := {"attributes": {"request": {"http": {"method": method, "path": path, "headers": headers}}}}

test_public_pages_are_open if {
	authz.allow.allowed with input as request("GET", "/public/hello", {})
}

test_writing_public_pages_is_not if {
	not authz.allow.allowed with input as request("POST", "/public/hello", {})
}

test_admin_pages_need_the_admin_role if {
	not authz.allow.allowed with input as request("GET", "/admin/users", {})
	authz.allow.allowed with input as request("GET", "/admin/users", {"x-role": "admin"})
}

test_a_denial_says_what_would_pass if {
	denial := authz.allow with input as request("GET", "/", {})
	denial.http_status == 403
	contains(denial.body, "/public/")
}
