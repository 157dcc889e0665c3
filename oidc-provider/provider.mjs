// A real OpenID provider (panva/oidc-provider, OpenID Certified) for authz-server's end-to-end
// tests and `authz-server demo --idp oidc-provider`. DEVELOPMENT ONLY: accounts with plain-text
// passwords from the config file, state in memory.
//
//   node provider.mjs CONFIG.json
//
// CONFIG.json (written by authz_server/mesh/oidcprovider.py):
//   issuer      "http://127.0.0.1:PORT"; port, host
//   keys        private JWKs; the first of each alg signs, all are published (rotation: put a new
//               key first and restart, the old one stays published)
//   clients     oidc-provider client metadata
//   accounts    {id: {password, claims}}
//   resources   {indicator: {audience, scope, format: "jwt"|"opaque", ttl}}
//   defaultResource  the indicator used when a request names none
//
// Turned on: discovery, JWKS, authorization code + PKCE (S256 required), refresh tokens,
// client credentials, introspection (and RFC 9701 JWT responses), revocation, DPoP,
// certificate-bound access tokens (the client certificate comes, URL-encoded PEM, in the
// x-client-cert header, as a TLS-terminating proxy would pass it), RP-initiated logout.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { X509Certificate } from 'node:crypto';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const accounts = config.accounts || {};
const resources = config.resources || {};

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const provider = new Provider(config.issuer, {
  clients: config.clients,
  jwks: { keys: config.keys },
  cookies: { keys: [config.cookieSecret] },
  pkce: { required: () => true },
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username', 'roles', 'groups'],
    email: ['email', 'email_verified'],
  },
  async findAccount(ctx, id) {
    const account = accounts[id];
    if (!account) return undefined;
    return { accountId: id, async claims() { return { sub: id, ...(account.claims || {}) }; } };
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  async issueRefreshToken(ctx, client) {
    return client.grantTypeAllowed('refresh_token');
  },
  ttl: {
    AccessToken: config.accessTokenTTL || 600,
    ClientCredentials: config.accessTokenTTL || 600,
    IdToken: 600,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
    RefreshToken: 3600,
    AuthorizationCode: 60,
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    jwtIntrospection: { enabled: true },
    revocation: { enabled: true },
    dPoP: { enabled: true },
    rpInitiatedLogout: { enabled: true },
    mTLS: {
      enabled: true,
      certificateBoundAccessTokens: true,
      getCertificate(ctx) {
        const header = ctx.get('x-client-cert');
        if (!header) return undefined;
        try {
          return new X509Certificate(decodeURIComponent(header));
        } catch {
          return undefined;
        }
      },
      certificateAuthorized() { return true; },
      certificateSubjectMatches() { return false; },
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => config.defaultResource,
      useGrantedResource: () => true,
      getResourceServerInfo(ctx, indicator) {
        const server = resources[indicator];
        if (!server) throw new Provider.errors.InvalidTarget();
        return {
          scope: server.scope,
          audience: server.audience,
          accessTokenTTL: server.ttl || 600,
          accessTokenFormat: server.format || 'jwt',
          jwt: { sign: { alg: server.alg || 'ES256' } },
        };
      },
    },
  },
  enabledJWA: {
    introspectionSigningAlgValues: ['ES256', 'RS256'],
    dPoPSigningAlgValues: ['ES256', 'EdDSA', 'Ed25519', 'PS256', 'RS256'],
  },
});
provider.proxy = true;

function page(res, status, body) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(`<!DOCTYPE html><html><head><title>Sign in</title></head><body>${body}</body></html>`);
}

async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 16384) throw new Error('form too large');
  }
  return new URLSearchParams(body);
}

// First-party provider: what the client asks for is granted once the user has signed in.
async function consent(req, res, interaction) {
  const { prompt: { details }, params, session } = interaction;
  const grant = interaction.grantId
    ? await provider.Grant.find(interaction.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (details.missingOIDCScope) grant.addOIDCScope(details.missingOIDCScope.join(' '));
  if (details.missingOIDCClaims) grant.addOIDCClaims(details.missingOIDCClaims);
  if (details.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(details.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  const grantId = await grant.save();
  const result = interaction.grantId ? { consent: {} } : { consent: { grantId } };
  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: true });
}

async function interactions(req, res, uid, action) {
  const interaction = await provider.interactionDetails(req, res);
  if (interaction.uid !== uid) return page(res, 400, '<p>interaction mismatch</p>');
  if (interaction.prompt.name === 'consent') return consent(req, res, interaction);
  if (action === 'login' && req.method === 'POST') {
    const form = await readForm(req);
    const account = accounts[form.get('login')];
    if (!account || account.password !== form.get('password')) {
      return page(res, 401, `<p>wrong user or password</p>${loginForm(uid)}`);
    }
    return provider.interactionFinished(req, res, { login: { accountId: form.get('login') } },
      { mergeWithLastSubmission: false });
  }
  return page(res, 200, loginForm(uid));
}

function loginForm(uid) {
  return `<form method="post" action="/interaction/${escapeHtml(uid)}/login">`
    + '<input name="login" autocomplete="username"><input name="password" type="password">'
    + '<button type="submit">Sign in</button></form>';
}

const callback = provider.callback();
const server = http.createServer((req, res) => {
  const match = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login))?$/.exec(req.url.split('?')[0]);
  if (!match) return callback(req, res);
  interactions(req, res, match[1], match[2]).catch((error) => {
    console.error('interaction failed:', error);
    if (!res.headersSent) page(res, 400, `<p>${escapeHtml(error.message)}</p>`);
  });
});
provider.on('server_error', (ctx, error) => console.error('server_error', error));
server.listen(config.port, config.host || '127.0.0.1', () => {
  console.log(`oidc-provider ${config.issuer} listening`);
});
for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => server.close(() => process.exit(0)));
