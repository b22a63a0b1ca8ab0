// Baseline target for scripts/bench: Go's standard reverse proxy in front of the bench upstream,
// adding the upstream bearer token the way a minimal hand-written gateway would.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address to serve on")
	upstream := flag.String("upstream", "", "upstream base URL, e.g. https://127.0.0.1:6443")
	caFile := flag.String("ca", "", "CA bundle that signed the upstream's certificate")
	tokenFile := flag.String("token-file", "", "file holding the upstream bearer token")
	certFile := flag.String("tls-cert", "", "serve HTTPS with this certificate (and -tls-key)")
	keyFile := flag.String("tls-key", "", "private key for -tls-cert")
	flag.Parse()

	target, err := url.Parse(*upstream)
	if err != nil {
		log.Fatal(err)
	}
	caPEM, err := os.ReadFile(*caFile)
	if err != nil {
		log.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	token, err := os.ReadFile(*tokenFile)
	if err != nil {
		log.Fatal(err)
	}
	authorization := "Bearer " + strings.TrimSpace(string(token))

	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: roots},
		MaxIdleConnsPerHost: 64, // as many as the load generator's connections
	}
	proxy.FlushInterval = -1 // watch events go out as they arrive
	rewrite := proxy.Director
	proxy.Director = func(request *http.Request) {
		rewrite(request)
		request.Header.Set("Authorization", authorization)
	}

	server := &http.Server{Addr: *listen, Handler: proxy}
	if *certFile != "" {
		log.Fatal(server.ListenAndServeTLS(*certFile, *keyFile))
	}
	log.Fatal(server.ListenAndServe())
}
